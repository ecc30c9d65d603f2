"""What a node does with records, consents, grants, disclosures and its transfer log: each
operation runs inside one unit of work of the store. Beside them, the transfer log's exports
(`bundle`: written and verified as files) and its archive to S3 (`archive`).
"""
