# syntax=docker/dockerfile:1
# Loyalty service image: SQLite in /data by default; PostgreSQL by setting LOYALTY_DATABASE_URL and
# LOYALTY_SECRET_KEY. Build: docker build -t loyalty .   Run: docker run -p 8000:8000 -v loyalty-data:/data loyalty

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY loyalty ./loyalty
RUN /opt/venv/bin/pip install --no-compile . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOYALTY_DATABASE_URL=sqlite+aiosqlite:////data/loyalty.db \
    LOYALTY_TIERS_FILE=/app/config/tiers.toml
RUN groupadd --system --gid 10001 loyalty \
    && useradd --system --uid 10001 --gid loyalty --home-dir /app --shell /usr/sbin/nologin loyalty \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY alembic.ini ./
COPY migrations ./migrations
COPY config ./config
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2).status == 200 else 1)"]
# `serve` applies migrations itself on the embedded SQLite default; on PostgreSQL run `loyalty db upgrade` first.
CMD ["loyalty", "serve", "--host", "0.0.0.0", "--port", "8000"]
