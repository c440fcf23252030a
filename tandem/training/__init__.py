"""Drafter training and evaluation against the frozen primary, and tuning the speculation settings.

    corpus.py       the training corpus: fetched from package registries, tokenized, split
    selfdistill.py  the primary's own greedy answers to instructions, as a corpus
    states.py       the primary's tapped states recorded once over a corpus, so a drafter trains without it
    train.py        trains the Tandem, Tandem-CE and vanilla drafters (and their routers)
    offline.py      trains a feature-level (or vanilla) drafter on the recorded states alone (`tandem train-drafter`)
    evaluate.py     Table 1 metrics and the exact greedy-SPEED acceptance replay
    tuning.py       ranks speculation settings by this machine's measured costs (`tandem tune`)

May import: `tandem.decoding`, `tandem.model`, `tandem.formats`, `tandem.config`, `tandem.errors`.
"""
