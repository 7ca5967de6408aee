"""albef: ALBEF-style vision-language pretraining (ITC + ITM + MLM with momentum distillation)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`albef.load` (albef.inference), imported on first use so that `import albef` stays light."""
    if name == "load":
        from albef.inference import load

        return load
    raise AttributeError(f"module 'albef' has no attribute {name!r}")
