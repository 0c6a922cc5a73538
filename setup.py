"""Distribution `concept-diffusion`: EncDiff (arXiv 2402.09712) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="concept-diffusion",
    version="0.1.0",
    description="JAX/Flax reimplementation of EncDiff: disentangled concept tokens through diffusion cross-attention",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["concept_diffusion", "concept_diffusion.*"]),
    install_requires=[
        "jax>=0.4.35,<0.11",
        "flax>=0.10.2,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.10,<0.13",
        "chex>=0.1.87,<0.2",
        "ml-collections>=0.1.1,<1.3",
        "absl-py>=2.0,<3",
        "numpy>=1.26,<3",
        "scikit-learn>=1.3,<2",
        "scipy>=1.10,<2",
        "pillow>=10,<14",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        "safetensors>=0.4.3,<1",
        "grain>=0.2.2,<0.3",
        "tensorflow-datasets>=4.9.6,<4.10",
        # TFDS 4.9.x needs it to build datasets on Python >= 3.9 too (dataset_builder.code_path), but declares it
        # only for Python < 3.9.
        "importlib_resources>=5.10,<8",
        "h5py>=3.10,<4",  # Shapes3D's official 3dshapes.h5
        # JAX needs it for jax_compilation_cache_max_size, which cli.enable_compilation_cache sets; without it every
        # read and write of the persistent cache fails (with a warning) and each process compiles the step again.
        "filelock>=3.12,<5",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # TensorFlow only to *prepare* TFDS's own shapes3d / dsprites builders (they encode PNGs with it); reading
        # TFDS data, preparing mpi3d / cars3d (concept_diffusion.data.prepare), training and the tests need none.
        "tfds": ["tensorflow>=2.16,<2.22"],
        # Only to read/write official PyTorch Lightning .ckpt files (concept_diffusion.interop).
        "torch": ["torch>=2.3,<2.14"],
    },
)
