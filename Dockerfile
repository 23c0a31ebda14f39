# The poolq image every service of docker-compose.yml runs (a different command each).
FROM python:3.12-slim
WORKDIR /opt/poolq
COPY pyproject.toml README.md ./
COPY poolq poolq
COPY api_shim api_shim
COPY worker worker
# Extra packages for one image only: docker-compose.yml's Flower service adds flower.
ARG EXTRA_PACKAGES=""
RUN pip install --no-cache-dir . $EXTRA_PACKAGES && useradd --create-home poolq && mkdir /data && chown poolq /data
USER poolq
ENV POOLQ_DATA_DIR=/data PYTHONUNBUFFERED=1
EXPOSE 8000
CMD ["poolq", "--help"]
