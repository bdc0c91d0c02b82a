"""Client-level differential privacy: pure accounting functions and the ε ledger.

Torch-free (the RDP analysis is stdlib `math` only; Google's ``dp_accounting``, imported lazily,
for the tight PLD accountant), so the coordinator and edge devices can both import it.
"""

from protocols.privacy.accounting import (
    ACCOUNTANTS,
    DEFAULT_ORDERS,
    INTEGER_ORDERS,
    HistoryEntry,
    client_sample_rate,
    epsilon_for_history,
    get_accountant,
    noise_multiplier_for,
    prv_epsilon,
    rdp_epsilon,
)
from protocols.privacy.ledger import (
    MECHANISM,
    LedgerEntry,
    LedgerFormatError,
    PrivacyLedger,
    load_ledger,
    save_ledger,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "INTEGER_ORDERS",
    "MECHANISM",
    "HistoryEntry",
    "LedgerEntry",
    "LedgerFormatError",
    "PrivacyLedger",
    "client_sample_rate",
    "epsilon_for_history",
    "get_accountant",
    "load_ledger",
    "noise_multiplier_for",
    "prv_epsilon",
    "rdp_epsilon",
    "save_ledger",
]
