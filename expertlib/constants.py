"""On-disk names and format constants, in one place."""

from __future__ import annotations

#: Version of the expert-set patch format this code writes. Readers refuse newer majors.
#: 2: digests are trees of per-tensor sha256 leaves (expertlib.verify); format 1 patches still open.
#: 3: the same digests; a registry stores the file under a tree over the same leaves (one hash pass,
#:    expertlib.verify.blob_digest) instead of the sha256 of the whole file. Format 2 files keep theirs.
#: 4: the same trees hashed with BLAKE3 (digests "blake3:<hex>"), 2.5x less CPU per byte; formats 1-3
#:    keep their sha256 digests and addresses.
PATCH_FORMAT_VERSION = 4
#: What a manifest without a format_version field reads as: one an older expertlib wrote (every
#: writer since format 4 writes the field), so the last format with sha256 digests.
UNVERSIONED_FORMAT = 3

#: File suffix of an expert-set patch (a safetensors file).
PATCH_SUFFIX = ".safetensors"

#: safetensors metadata key holding the JSON manifest.
MANIFEST_METADATA_KEY = "expertlib.manifest"

#: Tensor name scheme inside a patch (canonical form, independent of the architecture).
#:   layers.{l}.experts.{e}.gate   (I, H)
#:   layers.{l}.experts.{e}.up     (I, H)
#:   layers.{l}.experts.{e}.down   (H, I)
#:   layers.{l}.experts.{e}.{gate,up,down}_bias   optional, (I,) (I,) (H,)
#:   params.{full parameter name}  extra full tensors (shared experts, non-expert modules)
EXPERT_KEY = "layers.{layer}.experts.{expert}.{part}"
EXTRA_PARAM_PREFIX = "params."

#: ESFT reference adapter layout (deepseek-ai/ESFT).
ESFT_EXPERT_CFG = "expert_cfg.json"
ESFT_WEIGHTS = "model.safetensors"

#: Environment variable naming the local registry root.
REGISTRY_ENV = "EXPERTLIB_REGISTRY"
#: Default registry root, under the user's home.
DEFAULT_REGISTRY_DIR = "~/.cache/expertlib/registry"
#: Environment variable for expertlib's cache folder (`expertlib.fsutil.cache_dir`).
CACHE_ENV = "EXPERTLIB_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/expertlib"
#: Folder under the cache dir keeping the digests of base checkpoints' experts (expertlib.checkpoint).
BASE_DIGESTS_DIR = "base-digests"
#: Folder under the cache dir keeping sets packed in a kernel's layout (expertlib.vllm_plugin.packcache),
#: and the environment variable bounding it (a size; 0 turns it off).
PACKED_CACHE_DIR = "packed"
PACKED_CACHE_ENV = "EXPERTLIB_PACKED_CACHE"
#: The report written beside the demo base's weights; its presence marks a folder as the demo base.
DEMO_INFO_FILE = "demo_base.json"
#: Folder of reference data a base may ship beside its weights (`expertlib.esft.base_data`).
REFERENCE_DATA_DIR = "reference_data"
