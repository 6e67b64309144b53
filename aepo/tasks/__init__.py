"""Task definitions: prompts, documents, references and rewards the trainer runs on."""
