"""The meme data layer: sources -> records -> WebDataset shards -> a resumable stream."""
