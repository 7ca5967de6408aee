"""albef: ALBEF-style vision-language pretraining (ITC + ITM + MLM with momentum distillation)."""

__version__ = "0.1.0"
