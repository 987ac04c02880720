"""Demo data: a realistic shop history in one command, so a new user sees meaningful tiers (``generator.load_demo``)."""
