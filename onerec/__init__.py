"""OneRec: the generative recommender's model and everything offline.

This package holds the interaction data (sequence-file loader, leave-one-out split and the synthetic
world with a known ground truth), the semantic-ID tokenizer (collaborative item embeddings and balanced
residual k-means), the code-path trie, the encoder-decoder with its Mixture-of-Experts decoder, the
trie-constrained beam-search generator, training, evaluation and the build pipeline that publishes a
version to the model store. Importing the package itself is cheap on purpose: nothing heavy (torch,
numpy) is imported here, so tools such as the command line start fast and import only what they use.
"""

from __future__ import annotations

import os
import sys


def _stub_folders(package_dirs: list[str]) -> list[str]:
    """``onerec/`` folders elsewhere on sys.path that are namespace portions (no ``__init__.py``).

    Why: stubs that an outside client generates from proto/onerec/v1/recommender.proto with plain
    ``grpc_tools.protoc`` are the modules ``onerec.v1.recommender_pb2`` / ``_pb2_grpc``, written as
    ``OUT/onerec/v1/*.py`` without ``__init__.py`` files. Where this project is installed, its
    ``onerec`` package is found first and would hide them. Appending such folders to ``__path__`` is
    what PEP 420 would do if ``onerec`` were a namespace package, and what ``pkgutil.extend_path``
    does, restricted to folders that are not packages themselves: another copy of this project on
    sys.path never mixes its modules in, and the model's own directory stays first, so a portion can
    add modules (``onerec.v1``) but never replace one. sys.path is read once, when ``onerec`` is first
    imported, so the stubs' folder must be on it by then.
    """
    seen = {os.path.realpath(d) for d in package_dirs}
    found = []
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        candidate = os.path.join(entry or os.getcwd(), __name__)
        real = os.path.realpath(candidate)
        if real in seen or not os.path.isdir(real) or os.path.exists(os.path.join(real, "__init__.py")):
            continue
        seen.add(real)
        found.append(candidate)
    return found


__path__ = [*__path__, *_stub_folders(list(__path__))]
