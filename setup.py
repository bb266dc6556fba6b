"""dreambooth_jax: DreamBooth for Imagen-style cascaded diffusion models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dreambooth_jax",
    version="0.1.0",
    description=("Subject-driven fine-tuning (DreamBooth, textual inversion, two-stage) of "
                 "Imagen-style cascaded diffusion models (DeepFloyd IF, T5) in JAX/Flax."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dreambooth_jax", "dreambooth_jax.*"]),
    package_data={"dreambooth_jax": ["assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy",
        "ml_dtypes",
        "pillow",
        "sentencepiece>=0.2.0",
        "safetensors",
        "tqdm",
        "tensorboardX",
        # CLIP's BPE tokenizer for the evaluation (CLIP-T); imports without torch.
        "transformers>=5.0",
        # IF's caption cleaning (IFPipeline's default clean_caption=True), see captions.py.
        "beautifulsoup4",
        "ftfy",
    ],
    extras_require={
        # The procedural world's TFDS builder (dreambooth_jax/world/tfds_builder.py). It writes
        # ArrayRecord and reads it as a numpy data source, so TensorFlow is NOT needed.
        # tensorflow-datasets 4.9 imports importlib_resources for builders defined in a
        # package without declaring it on Python >= 3.9.
        "world": ["tensorflow-datasets>=4.9.9", "array_record", "importlib_resources"],
        # The PyTorch references our parity tests compare against. The runtime
        # never imports them.
        "test": [
            # pytest 9.2 keeps node ids in a structured `_id`: pytest-xdist 3.8's loadgroup
            # then cannot tag tests with their xdist_group, the groups are split over the
            # workers and each worker trains the shared session workdirs again.
            "pytest>=8.4,<9",
            "pytest-xdist",
            "torch==2.13.0",
            "diffusers>=0.42",
            # diffusers' load_lora_weights needs peft: the LoRA export is tested through it.
            "peft>=0.17",
            "protobuf",
            # Notebooks are executed by the tests.
            "nbclient",
            "nbformat",
            "ipykernel",
            # The world's TFDS builder is tested (without TensorFlow): the `world` extra.
            "tensorflow-datasets>=4.9.9",
            "array_record",
            "importlib_resources",
            # The LPIPS reference (lpips==0.1.4) is installed with --no-deps (see README):
            # its torchvision requirement would replace the CPU torch with a CUDA build.
        ],
    },
)
