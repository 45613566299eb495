"""Domain corpora, the byte-level tokenizer, packed streams and the Lightning datamodule.

- moe.data.tokenizer: ByteTokenizer (default), HFTokenizer, get_tokenizer, target_bytes
- moe.data.documents: Document, FASTA parsing, cutting into pieces, held-out split, byte budget
- moe.data.shipped: the corpus samples shipped as (compressed) package data
- moe.data.source_{text,code,dna,files,hf}: where each domain's documents come from
- moe.data.corpus: one domain's balanced, split corpus (cached in-process)
- moe.data.streams: packing, domain ids (domain_names), training schedules
- moe.data.datamodule: DomainDataModule

Submodules are imported explicitly: the datamodule pulls in Lightning, which the tokenizer
alone does not need.
"""
