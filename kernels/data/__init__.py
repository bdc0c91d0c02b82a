"""A device's own data, from files to scored token blocks; torch-free (edge devices use it).

``formats`` reads files and detects their layout, ``examples`` holds what one training
example is, ``templates`` renders conversations with the tokenizer's chat template and says
which characters are the response, ``blocks`` turns examples into fixed-length token blocks
with a mask of the tokens that are scored. The coordinator's optional central evaluation
uses the same code on a file it owns.
"""
