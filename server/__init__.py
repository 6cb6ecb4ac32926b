"""HTTP layer: llama.cpp-native and OpenAI-compatible APIs over the async engine."""
