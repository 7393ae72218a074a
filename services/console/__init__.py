"""The staff console and the resident pages (マイページ): server-rendered pages over the services' HTTP APIs."""
