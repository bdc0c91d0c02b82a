"""Built-in corpora a simulation can federate without the user bringing data.

Each module reads one corpus from an installed package (no download at run time) and turns it
into examples with the columns a simulation partitions by.
"""
