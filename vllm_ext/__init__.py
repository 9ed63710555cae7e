"""The vLLM side of ms_rpc: plugin, executor, codec, gRPC client and local launcher. Never imports mindspore."""
