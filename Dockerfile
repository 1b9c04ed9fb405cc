# LGAM · Figure 5 live — the Gradio app as a Docker image / Hugging Face Docker Space.
#
#   docker build -t lgam-app .
#   docker run --rm -p 7860:7860 lgam-app                 # CPU
#   docker run --rm --gpus all -p 7860:7860 lgam-app      # GPU (NVIDIA Container Toolkit)
#   docker run --rm -p 7860:7860 -v "$PWD/checkpoints:/home/user/app/checkpoints:ro" lgam-app
#
# Hugging Face Spaces conventions: the app listens on 0.0.0.0:7860 and runs as user uid 1000 with a
# writable $HOME. Checkpoints: ./checkpoints (manifest.json + *.safetensors) is copied in when it
# exists in the build context, or mount it at run time; without it the page says how to get them.
# Default torch wheels come from PyPI (CUDA build; also runs on CPU). For a smaller CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t lgam-app:cpu .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# OpenCV (pulled in by grad-cam, headless build) needs glib; curl-free health check uses python
RUN apt-get update \
    && apt-get install -y --no-install-recommends libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    MPLCONFIGDIR=/home/user/.cache/matplotlib \
    LGAM_CHECKPOINTS=/home/user/app/checkpoints
WORKDIR /home/user/app

# dependencies first (cached layer); torch and torchvision from one source (see DESIGN §7)
COPY --chown=user requirements.txt ./
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --user --index-url "$TORCH_INDEX_URL" torch==2.15.0 torchvision==0.29.2; \
    fi \
    && pip install --user -r requirements.txt \
    && python -c "import torchvision, pytorch_grad_cam, gradio"

# the library, the app and (when present) the checkpoints
COPY --chown=user . .
RUN pip install --user --no-deps . && mkdir -p checkpoints

EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "7860"]
