"""Third-party training programs with lstm_multi's layer swapped in (issue 23, item 6).

Each module restates one public example's model and training step, shortened to the model
and one step, with the framework's LSTM replaced by lstm_multi's in one place (the line
marked ``# the swap``), and a ``variant`` argument that selects which: ``None`` keeps the
framework's own layer, a variant name (``"lstm"``, ``"peephole"``, ...) takes lstm_multi's.
``tests/test_third_party.py`` trains both on synthetic data of the example's shapes and
checks that variant "lstm" follows the framework's own layer step by step.

* ``word_language_model``: pytorch/examples ``word_language_model`` (BSD-3-Clause)
* ``sst2``: google/flax ``examples/sst2`` (Apache-2.0)
* ``bidirectional_lstm_imdb``: keras-team/keras-io ``examples/nlp/bidirectional_lstm_imdb.py``
  (Apache-2.0)
* ``train_rnn``: patrick-kidger/equinox ``examples/train_rnn.ipynb`` (Apache-2.0)
"""
