"""quadllm inside other tools: transformers (:mod:`.hf`)."""
