"""`ServerSettings`: everything a server is started with, described once. `expertlib serve` builds
its options from these fields (type, bounds, default, description as help: `expertlib.cli.serve`),
so the command line and the library never disagree. Sizes are bytes here; the command line also
takes SIZE strings such as 4GiB."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

#: IPv4 clients as an IPv6 socket sees them (::ffff:a.b.c.d): a network holding all of these opens to
#: every IPv4 client
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def metrics_network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """One `--metrics-open` network, checked: a CIDR (a bare address is one host) that does not
    hold every client."""
    try:
        net = ipaddress.ip_network(value.strip())
    except ValueError:
        try:
            loose = ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"--metrics-open {value!r} is not a network; write a CIDR such as 10.0.0.0/8, "
                "192.168.1.0/24, 127.0.0.1/32 or fd00::/8"
            ) from None
        raise ValueError(f"--metrics-open {value!r} has host bits set; write the network, {loose}") from None
    if net.prefixlen == 0 or (net.version == 6 and net.supernet_of(_IPV4_MAPPED)):
        raise ValueError(
            f"--metrics-open {value} opens /metrics (which names the loaded sets) to every client; "
            "name the private networks your scrapers are on (10.0.0.0/8, 172.16.0.0/12, "
            "192.168.0.0/16, fd00::/8), or give them the metrics key (--metrics-key)"
        )
    return net


class ServerSettings(BaseModel):
    """Everything `expertlib serve` is started with."""

    base: str = Field(description="base model folder or hub id")
    served_name: str | None = Field(
        default=None, description="the base model's `model` name (default: BASE as given)"
    )
    registry: str | None = Field(
        default=None,
        description="registry folder (default: $EXPERTLIB_REGISTRY, else ~/.cache/expertlib/registry)",
    )
    expert_sets: list[str] = Field(
        default_factory=list,
        description="load this set before ready: task, task@version, task@tag or a .safetensors patch",
    )
    all_sets: bool = Field(default=False, description="load every registered set of this base before ready")
    # None (library use only): the engine's default slot count
    slots: int | Literal["auto"] | None = Field(
        default="auto",
        description="extra expert slots per MoE layer. auto: what the sets named at start need plus one "
        "typical set, or --expert-memory divided by one slot's size. Start-up refuses (with the numbers) "
        "sets that do not all fit",
    )
    expert_memory: int | None = Field(
        default=None,
        ge=1,
        description="memory for expert slots, e.g. 4GiB (sets --slots auto to SIZE / one slot in every "
        "MoE layer)",
    )
    max_sets: int | None = Field(
        default=None, ge=1, description="most expert sets resident at once (default: sized)"
    )
    kv_cache_memory: int | None = Field(
        default=None,
        ge=1,
        description="KV cache size, e.g. 2GiB (vLLM's kv_cache_memory_bytes). Default on CPU: room for "
        "max-num-seqs sequences of max-model-len tokens, at most half the free memory after weights and "
        "slots",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        description="context length in tokens (default: the model's, shortened on CPU if its KV cache "
        "cannot fit)",
    )
    host_cache_memory: int | None = Field(
        default=None,
        ge=0,
        description="host memory for recently used sets, so reloading an evicted set is a copy (default: "
        "10% of free memory, at most 4GiB; 0 turns it off)",
    )
    packed_cache_disk: int | None = Field(
        default=None,
        ge=0,
        description="disk for sets packed in the CPU kernel's layout ($EXPERTLIB_CACHE/packed), so a set "
        "this machine packed before loads as one read, e.g. 32GiB (default: EXPERTLIB_PACKED_CACHE, else a "
        "quarter of the free disk, at most 64GiB; 0 turns it off)",
    )
    prepack: bool = Field(
        default=True,
        description="pack the registry's sets of this base into the packed-set disk cache while no request "
        "runs (newest versions first, the registry listed again every few seconds), so that a set's first "
        "request loads as one read of packed rows; pauses while requests run and fills only the cache's "
        "free space. Needs a registry, the packed-set cache (--packed-cache-disk not 0) and --verify-loads once",
    )
    verify_loads: Literal["once", "always"] = Field(
        default="once",
        description="once: hash a set file in full once (at registry ingest or first load) and trust it "
        "while it is unchanged (device, inode, size, mtime, ctime); always: hash every load",
    )
    weight_bound: float = Field(
        default=256.0,  # expertlib.bounds.DEFAULT_FACTOR (not imported: parsing options needs no torch)
        gt=0,
        description="refuse a set whose expert weights exceed FACTOR x the largest |w| of the base's experts "
        "in the same layer and part (gate/up, down); inf turns the check off (expertlib.bounds)",
    )
    auto_threshold: float = Field(
        default=0.55,  # between the base tasks' and the sets' similarities on the demo world (bench/auto_route.py)
        ge=0,
        le=1,
        description='model="auto": serve the set whose routing profile is most similar to the prompt\'s '
        "routing under the base (expertlib.profile.similarity: the likelihood of the prompt's top-k picks) "
        "when the similarity reaches this and no base anchor is closer, else the base",
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    api_key: str | None = Field(default=None, description="required on inference routes (Bearer)")
    admin_key: str | None = Field(
        default=None, description="enables admin routes and guards them (Bearer); they are off without it"
    )
    metrics_key: str | None = Field(
        default=None,
        description="key for GET /metrics (the admin key works too); /metrics is open only without any key "
        "and to the --metrics-open networks",
    )
    metrics_open: list[str] = Field(
        default_factory=list,
        description="answer GET /metrics without a key to clients whose address is in this network, a "
        "CIDR such as 10.0.0.0/8 or 127.0.0.1/32 (every other client, and every other route, still needs "
        "its key). The address is the connection's: behind a proxy, the proxy's; a request carrying "
        "X-Forwarded-For or Forwarded always needs the key. 0.0.0.0/0 and ::/0 are refused",
    )
    max_request_sequences: int = Field(
        default=64,
        ge=1,
        description="most sequences (prompts x n) one request may ask for; more get 400",
    )
    max_body_bytes: int = Field(
        default=16 * 2**20,
        ge=1024,
        description="largest inference request body in bytes; larger ones get 413",
    )
    max_prompt_chars: int | None = Field(
        default=None,
        ge=1,
        description="longest prompt in characters; longer ones get 400 before they are tokenized "
        "(default: 32 x the context length in tokens)",
    )
    load_on_demand: bool = Field(
        default=True,
        description="load a registered set that is not resident when a request names it (evicting the "
        "least recently used unpinned sets); requests for a set being loaded wait for it",
    )
    pull_from: str | None = Field(
        default=None,
        description="a registry remote (s3://bucket/prefix, gs://, az://, fsspec::URL, http(s)://, a folder) "
        "to pull a requested set from when the registry does not hold it; then it is loaded on demand",
    )
    pins: list[str] = Field(
        default_factory=list,
        description="load this set before ready and keep it resident (never evicted); with --replicas, "
        "on every replica",
    )
    max_queue: int = Field(default=256, ge=1, description="requests admitted at once; more get 429")
    default_max_tokens: int = Field(
        default=256, ge=1, description="the max_tokens of a request that gives none"
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="extra vLLM engine argument, e.g. max_model_len=2048 or enforce_eager=true",
    )

    @field_validator("metrics_open")
    @classmethod
    def _networks(cls, values: list[str]) -> list[str]:
        return [str(metrics_network(v)) for v in values]

    @model_validator(mode="after")
    def _distinct_keys(self) -> ServerSettings:
        keys = {"api_key": self.api_key, "admin_key": self.admin_key, "metrics_key": self.metrics_key}
        given = [(n, k) for n, k in keys.items() if k is not None]
        for i, (a, ka) in enumerate(given):
            for b, kb in given[i + 1 :]:
                if ka == kb:
                    raise ValueError(
                        f"{a} and {b} must differ (with equal keys, one grants the other's routes)"
                    )
        return self

    @property
    def model_name(self) -> str:
        return self.served_name or self.base


__all__ = ["ServerSettings", "metrics_network"]
