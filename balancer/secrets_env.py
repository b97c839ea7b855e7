"""The balancer's secrets in the environment: their variable names and how values are read.

``neuron-fleet balance`` reads them from its own environment (balancer/cli.py); ``serve``
reads them from the environment and the env file through supervisor/layering.py. Both parse
them here, so the same variables give the same settings under either command.

A blank value (empty or only spaces) counts as unset, as an empty one always did: it never
turns API keys off over a value from a lower layer (the env file).
"""

from __future__ import annotations

from collections.abc import Mapping

ADMIN_TOKEN_VAR = "NEURON_FLEET_ADMIN_TOKEN"
API_KEYS_VAR = "NEURON_FLEET_API_KEYS"
REPLICA_API_KEY_VAR = "NEURON_FLEET_REPLICA_API_KEY"

SECRET_VARS: dict[str, str] = {
    ADMIN_TOKEN_VAR: "admin_token",
    API_KEYS_VAR: "api_keys",
    REPLICA_API_KEY_VAR: "replica_api_key",
}
"""Environment variable -> the ``BalancerConfig`` field it sets."""

SecretValue = str | tuple[str, ...] | None


def parse_token(raw: str) -> str | None:
    """One token; spaces around it dropped (a client's ``Bearer`` token never has any:
    ``balancer.access.bearer_matches`` strips it), None if blank."""
    return raw.strip() or None


def parse_api_keys(raw: str) -> tuple[str, ...]:
    """Comma-separated keys: ``" k-1 , k-2,, "`` -> ``("k-1", "k-2")``."""
    return tuple(key for key in (item.strip() for item in raw.split(",")) if key)


def parse_secret(name: str, raw: str) -> SecretValue:
    """The value of secret variable ``name``; falsy when blank (= unset)."""
    if name not in SECRET_VARS:
        raise KeyError(f"{name} is not one of the balancer's secret variables")
    return parse_api_keys(raw) if name == API_KEYS_VAR else parse_token(raw)


def secrets_from_env(env: Mapping[str, str]) -> dict[str, SecretValue]:
    """``BalancerConfig`` field -> value for each secret variable set (not blank) in ``env``."""
    values = {}
    for name, field_name in SECRET_VARS.items():
        value = parse_secret(name, env.get(name, ""))
        if value:
            values[field_name] = value
    return values
