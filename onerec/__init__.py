"""OneRec: the generative recommender's model and everything offline.

This package holds the interaction data (sequence-file loader, leave-one-out split and the synthetic
world with a known ground truth), the semantic-ID tokenizer (collaborative item embeddings and balanced
residual k-means), the code-path trie, the encoder-decoder with its Mixture-of-Experts decoder, the
trie-constrained beam-search generator, training, evaluation and the build pipeline that publishes a
version to the model store. Importing the package itself is cheap on purpose: nothing heavy (torch,
numpy) is imported here, so tools such as the command line start fast and import only what they use.
"""
