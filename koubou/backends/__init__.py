"""LLM backends: one class per server kind, all behind `koubou.backends.base.Backend`."""
