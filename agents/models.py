"""Choosing a chat model from the environment, so one workflow runs offline or on a real model.

``chat_model_from_env(offline)`` returns ``offline()`` unless ``SCOPEGRAPH_MODEL_PROVIDER``
names a provider:

- ``openai``: any OpenAI-compatible endpoint (OpenAI, vLLM, LM Studio, llama.cpp server…)
  through ``langchain-openai``. ``SCOPEGRAPH_MODEL`` (default ``gpt-4o-mini``),
  ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` as that package reads them.
- ``ollama``: a local Ollama server through ``langchain-ollama``. ``SCOPEGRAPH_MODEL``
  (default ``llama3.1``), ``OLLAMA_BASE_URL`` (default ``http://127.0.0.1:11434``).

The provider packages are not dependencies of scopegraph: install the one you use
(``pip install langchain-openai`` or ``pip install langchain-ollama``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping

from langchain_core.language_models import BaseChatModel

from scopegraph.errors import ConfigError

PROVIDER_VARIABLE = "SCOPEGRAPH_MODEL_PROVIDER"
MODEL_VARIABLE = "SCOPEGRAPH_MODEL"

_PROVIDERS = {
    # provider: (module, class, default model, package to install)
    "openai": ("langchain_openai", "ChatOpenAI", "gpt-4o-mini", "langchain-openai"),
    "ollama": ("langchain_ollama", "ChatOllama", "llama3.1", "langchain-ollama"),
}


def chat_model_from_env(
    offline: Callable[[], BaseChatModel], *, environ: Mapping[str, str] | None = None
) -> BaseChatModel:
    """The configured real chat model, or ``offline()`` when none is configured.

    Raises:
        ConfigError: unknown provider, or its package is not installed.
    """
    env = os.environ if environ is None else environ
    provider = (env.get(PROVIDER_VARIABLE) or "").strip().lower()
    if not provider:
        return offline()
    if provider not in _PROVIDERS:
        raise ConfigError(f"unknown {PROVIDER_VARIABLE} {provider!r}: use one of {', '.join(sorted(_PROVIDERS))}")
    module_name, class_name, default_model, package = _PROVIDERS[provider]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(f"{PROVIDER_VARIABLE}={provider} needs the {package!r} package: "
                          f"pip install {package}") from None
    model = env.get(MODEL_VARIABLE) or default_model
    kwargs: dict[str, object] = {"model": model, "temperature": 0}
    if provider == "ollama":
        kwargs["base_url"] = env.get("OLLAMA_BASE_URL") or "http://127.0.0.1:11434"
    chat: BaseChatModel = getattr(module, class_name)(**kwargs)
    return chat


def describe_model(model: BaseChatModel) -> str:
    """A short, secret-free name for a model, for example output."""
    name = getattr(model, "model_name", None) or getattr(model, "model", None)
    return f"{type(model).__name__}({name})" if isinstance(name, str) else type(model).__name__
