"""Test helpers shared across the suite: tiny random HF models (`hf_tiny`), tiny DeepSeek-V3
checkpoints (`deepseek_tiny`) and tiny GGUF files (`gguf_tiny`)."""
