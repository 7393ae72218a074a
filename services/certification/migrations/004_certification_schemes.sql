-- Certification schemes (issue #19): certifying dual residents is not tied to a 特定居住促進計画.
-- Each municipality's row is its scheme: the legal basis it certifies under (an adopted plan, or a
-- 先導的モデル事業 / the municipality's own scheme), when the scheme is in force, and its rules.
-- Rows seeded before this were all plan-based.
ALTER TABLE municipality_rules
    ADD COLUMN legal_basis         text NOT NULL DEFAULT 'plan' CHECK (legal_basis IN ('plan', 'model_project')),
    ADD COLUMN scheme_valid_from   date,
    ADD COLUMN scheme_valid_until  date,
    ADD CONSTRAINT municipality_rules_scheme_period
        CHECK (scheme_valid_until IS NULL OR scheme_valid_from IS NULL OR scheme_valid_until >= scheme_valid_from),
    ADD CONSTRAINT municipality_rules_plan_dated CHECK (legal_basis = 'plan' OR plan_adopted_on IS NULL);
-- 'planning': the plan is known from planning.plans.v1 (PlanAdopted / PlanWithdrawn).
ALTER TABLE municipality_rules DROP CONSTRAINT municipality_rules_plan_source_check;
ALTER TABLE municipality_rules
    ADD CONSTRAINT municipality_rules_plan_source_check CHECK (plan_source IN ('reference', 'admin', 'planning'));
