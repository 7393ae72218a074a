-- Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d),
-- as the POSTGRES_USER (nichiiki), connected to POSTGRES_DB (nichiiki).
--
-- Every service gets its own database, named from the one DSN's database plus the service name:
-- NICHIIKI_PG_DSN=postgresql://nichiiki:nichiiki@postgres:5432/nichiiki -> nichiiki_<service>.
-- Each service creates its own tables (migrations) on start.

CREATE DATABASE nichiiki_registration OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_certification OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_subsidy OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_donation OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_notification OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_partner_gateway OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_identity OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_planning OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_insights OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
CREATE DATABASE nichiiki_listings OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
-- the key store of crypto-shredding, one for every service (docs/privacy.md)
CREATE DATABASE nichiiki_keyring OWNER nichiiki ENCODING 'UTF8' TEMPLATE template0;
