"""Chat formats below the engine: rendering conversations with tools in each model's format
(`chat.formats`) and parsing tool calls out of generated text (`chat.parse`). `serve`,
`posttrain` and `tools` use them; they use only the tokenizer."""
