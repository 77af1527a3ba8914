"""Choosing the chat model from the environment: offline by default, a real provider when asked."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel

from scopegraph.agents.models import MODEL_VARIABLE, PROVIDER_VARIABLE, chat_model_from_env, describe_model
from scopegraph.agents.testing import ScriptedChatModel
from scopegraph.errors import ConfigError


def offline() -> BaseChatModel:
    return ScriptedChatModel(replies=[])


def test_without_a_provider_the_offline_model_is_used() -> None:
    assert isinstance(chat_model_from_env(offline, environ={}), ScriptedChatModel)
    assert isinstance(chat_model_from_env(offline, environ={PROVIDER_VARIABLE: "  "}), ScriptedChatModel)


def test_an_unknown_provider_is_one_clear_error() -> None:
    with pytest.raises(ConfigError) as refused:
        chat_model_from_env(offline, environ={PROVIDER_VARIABLE: "openia"})
    assert str(refused.value) == f"unknown {PROVIDER_VARIABLE} 'openia': use one of ollama, openai"


@pytest.mark.parametrize(("provider", "package"), [("openai", "langchain-openai"), ("ollama", "langchain-ollama")])
def test_a_provider_whose_package_is_missing_says_what_to_install(
        provider: str, package: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)  # as if not installed
    with pytest.raises(ConfigError) as refused:
        chat_model_from_env(offline, environ={PROVIDER_VARIABLE: provider})
    assert f"pip install {package}" in str(refused.value) and "\n" not in str(refused.value)


class _Recorded(ScriptedChatModel):
    """Stands in for a provider's chat class: records what it was built with."""

    built: dict[str, Any] = {}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(replies=[])
        type(self).built = kwargs


@pytest.mark.parametrize(("provider", "module", "cls", "expected"), [
    ("openai", "langchain_openai", "ChatOpenAI", {"model": "gpt-4o-mini", "temperature": 0}),
    ("ollama", "langchain_ollama", "ChatOllama",
     {"model": "llama3.1", "temperature": 0, "base_url": "http://127.0.0.1:11434"}),
])
def test_a_configured_provider_is_built_from_the_environment(
        provider: str, module: str, cls: str, expected: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType(module)
    setattr(fake, cls, _Recorded)
    monkeypatch.setitem(sys.modules, module, fake)
    model = chat_model_from_env(offline, environ={PROVIDER_VARIABLE: provider.upper()})
    assert isinstance(model, _Recorded) and _Recorded.built == expected
    chat_model_from_env(offline, environ={PROVIDER_VARIABLE: provider, MODEL_VARIABLE: "my-model"})
    assert _Recorded.built["model"] == "my-model"


def test_describe_model_names_the_class() -> None:
    assert describe_model(offline()) == "ScriptedChatModel"
