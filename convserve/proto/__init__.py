"""Generated from protos/ by scripts/gen_protos.py (`make protos`); do not edit."""

from google.protobuf import descriptor_pool

# Our own pool: tritonclient puts the same inference.* names into the default one.
POOL = descriptor_pool.DescriptorPool()
