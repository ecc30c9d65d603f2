"""What a node does with records, consents, grants, disclosures and its transfer log, each
inside one unit of work.
"""
