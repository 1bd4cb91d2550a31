# The wbc-trust web app on CPU.
#   docker build -t wbc-trust . && docker run -p 8501:8501 wbc-trust    → http://localhost:8501
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# CPU-only torch and torchvision (the versions pinned in requirements.txt) from PyTorch's CPU wheel index: PyPI's
# default wheels carry CUDA libraries, gigabytes this image never uses.
COPY requirements.txt ./
RUN grep -E '^torch(vision)?==' requirements.txt > /tmp/torch-cpu.txt \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu -r /tmp/torch-cpu.txt \
    && rm /tmp/torch-cpu.txt

COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && groupadd --gid 10001 wbc \
    && useradd --create-home --uid 10001 --gid 10001 wbc

# a numeric user id, so that Kubernetes and friends can check "runAsNonRoot" without reading /etc/passwd
USER 10001:10001
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
CMD ["wbc", "app", "--port", "8501", "--address", "0.0.0.0"]
