"""The data: tokenShards (the shard format, data streams, validation sequences) and vocabulary (GPT-2's and a
corpus BPE, bytes per token)."""
