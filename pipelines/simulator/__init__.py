"""The generator behind `nlpctr data simulate`: lexicon (texts and cues), world (entities and
the auction graph), clicks (rows and their ground truth). Pure numpy and pyarrow, no Beam."""
