"""pacekern.llm: offline LLM inference on pacekern kernels (see llm/generate.py for the API)."""
from .generate import GenerationOutput, LLMModel, Metrics
from .kv_cache import KVCacheConfig
from .ops import OpConfig
from .sampling import SamplingConfig

__all__ = ["LLMModel", "SamplingConfig", "OpConfig", "KVCacheConfig", "GenerationOutput", "Metrics"]
from .speculative import DraftModelSpecDecodeConfig, PardSpecDecodeConfig  # noqa: E402

__all__ += ["PardSpecDecodeConfig", "DraftModelSpecDecodeConfig"]
from .engine import Engine, EngineConfig, OverloadedError, Request, RequestOutput  # noqa: E402

__all__ += ["Engine", "EngineConfig", "Request", "RequestOutput", "OverloadedError"]
