"""One module per backend; ``lstm_multi.registry`` imports them on demand."""
