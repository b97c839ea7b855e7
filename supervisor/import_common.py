"""What every ``neuron-fleet import`` source shares: the result, the problems, the notes,
and which environment variables hold secrets."""

from __future__ import annotations

import re
from dataclasses import dataclass

SERVICE_ENV_FILE = "/etc/neuron-fleet/neuron-fleet.env"
"""Where the installed service reads secrets from (``neuron-fleet install-service``)."""
DEFAULT_OUTPUT = "fleet.toml"
HF_TOKEN_NAMES = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN"})
SECRET_WORDS = frozenset(
    {"TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY", "KEY", "CREDENTIAL", "CREDENTIALS"}
)
"""An environment variable with one of these words (``_``-separated) holds a secret."""


class ImportProblem(Exception):
    """The inputs cannot be turned into a fleet.toml at all (every reason listed)."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass
class ImportResult:
    toml: str
    notes: list[str]
    services: list[str]
    """What each replica replaces (compose services, optimum's data-parallel ranks), in
    replica order (replica-0 first)."""
    listen: str
    replaces: str = "COMPOSE SERVICE"
    """The summary's heading for ``services``."""


def is_secret(name: str) -> bool:
    """An environment variable that holds a secret. ``SM_ON_*`` ones are vLLM flags for
    optimum-neuron's image (``SM_ON_API_KEY`` is ``--api_key``): judged as flags are."""
    if name.upper().startswith("SM_ON_"):
        return names_a_secret(name)
    return name in HF_TOKEN_NAMES or bool(SECRET_WORDS & set(name.upper().split("_")))


_SECRET_LAST_WORDS = frozenset({"TOKEN", "KEY", "APIKEY", "SECRET", "PASSWORD", "PASSWD"})


def names_a_secret(flag: str) -> bool:
    """A command-line flag (or ``SM_ON_*`` name) whose value is a secret: its last word says
    so (``--api-key``, ``--hf-token``, ``SM_ON_API_KEY``). Stricter than ``is_secret``, which
    would also take vLLM's ``--long-prefill-token-threshold``,
    ``--return-tokens-as-token-ids`` and ``--allow-credentials`` (vllm 0.11.0
    engine/arg_utils.py, entrypoints/openai/cli_args.py) for secrets."""
    return re.split(r"[-_]", flag.lstrip("-").upper())[-1] in _SECRET_LAST_WORDS


def _group(nodes: list[str]) -> str:
    return nodes[0] if len(nodes) == 1 else ", ".join(nodes[:-1]) + " and " + nodes[-1]


class Notes:
    """Notes in first-seen order; the same text for several services is said once."""

    def __init__(self) -> None:
        self._items: dict[str, list[str]] = {}

    def add(self, text: str, service: str | None = None) -> None:
        owners = self._items.setdefault(text, [])
        if service and service not in owners:
            owners.append(service)

    def extend(self, texts: list[str]) -> None:
        for text in texts:
            self.add(text)

    def render(self) -> list[str]:
        return [
            f"{_group(owners)}: {text}" if owners else text for text, owners in self._items.items()
        ]


def written_header(source: str) -> list[str]:
    """The comment lines every written fleet.toml starts with."""
    return [
        f"Written by `neuron-fleet import` from {source}.",
        "Review it, then:",
        "  neuron-fleet plan  --config fleet.toml    # cores, devices, ports, commands",
        "  neuron-fleet serve --config fleet.toml    # replicas + balancer, one process",
        "Secrets (HF_TOKEN) are not in this file: put them in the environment or in",
        f"{SERVICE_ENV_FILE} (mode 0600). docs/configuration.md lists every key.",
    ]
