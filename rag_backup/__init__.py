"""rag-backup: backup and restore orchestrator for the RAG service's four data stores."""
