# Production image for the pipeline services (coalesce and merge tiers).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --system --no-create-home --uid 10001 pipeline

USER pipeline
ENTRYPOINT ["pipeline"]
CMD ["--help"]
