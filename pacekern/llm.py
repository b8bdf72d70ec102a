"""`from pacekern.llm import LLMModel, SamplingConfig`: re-exports the public API of the llm package."""
from llm import *  # noqa: F401,F403
from llm import __all__  # noqa: F401
