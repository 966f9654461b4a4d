"""Tables in, text out: built-in and user datasets, splits and few-shot samples, row serialization."""
