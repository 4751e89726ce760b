"""Glue between iso_megatron and host frameworks (installed as `iso_megatron.patches`)."""
