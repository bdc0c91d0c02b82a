"""Cryptographic core of secure aggregation: pure functions on bytes and numpy arrays.

SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017) and its sparse-graph variant SecAgg+ (Bell et al., "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020) let the coordinator learn the sum of
the clients' updates and nothing else about any one of them, even when clients drop out.
Flower's own SecAgg+ runs only on its legacy API and derives masks from a 32-bit fold of the
seed; these modules use ``cryptography`` primitives keyed by full 256-bit secrets.

Modules, in the order a round uses them:

* :mod:`~protocols.secagg.fixed_point` — floats to integers mod ``2**k`` and back;
* :mod:`~protocols.secagg.keys` — X25519 + HKDF-SHA256 pair keys, sealed share payloads;
* :mod:`~protocols.secagg.shamir` — t-out-of-n sharing of 32-byte secrets;
* :mod:`~protocols.secagg.masks` — ChaCha20 masks, the masked upload;
* :mod:`~protocols.secagg.unmask` — the coordinator's unmasking, the client's refusal check.

No Flower types here: the coordinator and client message stages call these functions.
"""

from protocols.secagg.fixed_point import check_headroom, decode_sum, encode, error_bound
from protocols.secagg.keys import (
    SealError,
    generate_keypair,
    hkdf_sha256,
    load_private_key,
    open_sealed,
    pair_info,
    pair_key,
    private_bytes,
    public_bytes,
    seal,
    share_associated_data,
    shared_secret,
)
from protocols.secagg.masks import masked_input, new_seed, pairwise_mask, prg_mask, self_mask
from protocols.secagg.shamir import combine, split
from protocols.secagg.unmask import (
    InconsistentRequest,
    check_unmask_request,
    dropped_pair_seeds,
    min_threshold,
    reconstruct_secrets,
    remove_masks,
    sum_masked,
)

__all__ = [
    "InconsistentRequest",
    "SealError",
    "check_headroom",
    "check_unmask_request",
    "combine",
    "decode_sum",
    "dropped_pair_seeds",
    "encode",
    "error_bound",
    "generate_keypair",
    "hkdf_sha256",
    "load_private_key",
    "masked_input",
    "min_threshold",
    "new_seed",
    "open_sealed",
    "pair_info",
    "pair_key",
    "pairwise_mask",
    "prg_mask",
    "private_bytes",
    "public_bytes",
    "reconstruct_secrets",
    "remove_masks",
    "seal",
    "self_mask",
    "share_associated_data",
    "shared_secret",
    "split",
    "sum_masked",
]
