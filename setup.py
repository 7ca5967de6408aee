from setuptools import find_packages, setup

setup(
    name="albef",
    version="0.1.0",
    description="ALBEF-style vision-language pretraining: faithful, fast, resumable",
    packages=find_packages(include=["albef", "albef.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",  # nn.utils.get_total_norm, public fully_shard
        "torchvision",
        "timm>=1.0",
        "transformers>=4.40",
        "safetensors",
        "huggingface_hub>=0.23",  # albef export / push, hf-hub: names
        "webdataset",
        "tensorboard",
        "matplotlib",
        "pillow",
        "PyYAML",
        "numpy",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "albef=albef.command:main",
            "albef-pretrain=albef.pretrain:main",
            "albef-demo=albef.demo:main",
            "albef-retrieval=albef.tasks.retrieval:main",
            "albef-ve=albef.tasks.ve:main",
            "albef-nlvr=albef.tasks.nlvr:main",
            "albef-nlvr-pretrain=albef.tasks.nlvr_pretrain:main",
            "albef-vqa=albef.tasks.vqa:main",
            "albef-grounding=albef.tasks.grounding:main",
        ]
    },
)
