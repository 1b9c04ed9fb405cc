# LGAM · Figure 5 live — the Gradio app as a container image / Hugging Face Docker Space.
#
#   docker build -t lgam-app .                                   # GPU image (PyPI torch, CUDA inside)
#   docker build --build-arg TORCH=cpu -t lgam-app:cpu .         # CPU image (PyTorch's CPU wheels)
#   docker run --rm -p 7860:7860 lgam-app                        # runs on the CPU without a GPU too
#   docker run --rm --gpus all -p 7860:7860 lgam-app             # NVIDIA GPU (Container Toolkit)
#   docker run --rm -p 8080:8080 -e GRADIO_SERVER_PORT=8080 lgam-app
#   docker run --rm -p 7860:7860 -v "$PWD/checkpoints:/home/user/app/checkpoints:ro" lgam-app
#
# Hugging Face Spaces conventions: listens on $GRADIO_SERVER_NAME:$GRADIO_SERVER_PORT (0.0.0.0:7860)
# as uid 1000 with a writable $HOME. Layers, most stable first: Python packages (root-owned venv),
# the weights (checkpoints/), then the code, so that a code change re-sends neither packages nor
# weights. Code, weights and packages belong to root: the app's user can read, not change, them.
# `python -m app` handles SIGTERM, so `docker stop` returns at once.
# a Debian release named, so that a rebuild gets the g++ and glibc the kernels were checked with
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# gpu: torch from PyPI (CUDA libraries included, ~5 GB; runs on a CPU as well)
# cpu: torch and torchvision from PyTorch's index of CPU-only wheels (without their dependencies,
#      which come from PyPI with the rest: that index need not carry them at these versions; ~1 GB)
ARG TORCH=gpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="lgam-app" \
      org.opencontainers.image.description="LGAM Figure 5, live: Grad-CAMs of six attention ResNet18s" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# a C++ compiler for LGAM's CPU kernels (lgam/attention/lgam/kernels.cpp: built on first use, ~2 s,
# into the user's cache, for the machine the container runs on); without it LGAM runs its equations
# as plain tensor ops
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# runtime requirements only (tests and their tools stay out of the image), at the tested versions
COPY requirements.txt /opt/lgam-requirements.txt
COPY constraints.txt /opt/lgam-constraints.txt
RUN python3 -m venv /opt/venv \
    && if [ "$TORCH" = cpu ]; then \
         pip install --no-deps --index-url "$TORCH_CPU_INDEX" \
           "$(grep -E '^torch==' /opt/lgam-requirements.txt)" \
           "$(grep -E '^torchvision==' /opt/lgam-requirements.txt)"; \
       elif [ "$TORCH" != gpu ]; then echo "TORCH must be cpu or gpu, got '$TORCH'" >&2; exit 2; fi \
    && pip install -c /opt/lgam-constraints.txt -r /opt/lgam-requirements.txt \
    && python -c "import sys, torch, torchvision, pytorch_grad_cam, gradio, cv2; print('torch', torch.__version__); \
sys.exit('$TORCH' == 'cpu' and torch.version.cuda is not None and 'TORCH=cpu installed a CUDA torch')"

RUN useradd --create-home --uid 1000 user
ENV HOME=/home/user \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    MPLCONFIGDIR=/home/user/.cache/matplotlib \
    LGAM_CHECKPOINTS=/home/user/app/checkpoints
WORKDIR /home/user/app

# the weights (their own layer; the build context needs the folder, but with no weights in it the
# page says how to get them, or mount them at run time), then the code
COPY checkpoints/ checkpoints/
COPY lgam/ lgam/
COPY app/ app/
COPY LICENSE ./

USER user
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/' % os.environ.get('GRADIO_SERVER_PORT', '7860'), timeout=4)"
CMD ["python", "-m", "app"]
