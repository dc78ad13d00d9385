"""What training and sampling both run on: checkpoints, shardings, the train state, console,
compile and trace caches, summaries and the workdir layout."""
