"""The marketing dashboard: server-rendered pages with charts, behind a key-for-session sign-in."""
