"""HuggingFace `transformers` interop: weight maps between LCLModel and CLIPVisionModel / OPTForCausalLM."""
