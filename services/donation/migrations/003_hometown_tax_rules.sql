-- Hometown-tax designation and corporate plans (issue #19, rules 2 and 3).
-- special_deduction: a hometown-tax donation to a municipality designated for ふるさと納税 on the
-- payment date (the receipt serves the special deduction and the one-stop exception). A payment to
-- a municipality that was not designated is recorded as an ordinary donation (false).
-- Rows recorded before: every hometown-tax donation was treated as designated.
ALTER TABLE donations ADD COLUMN special_deduction boolean NOT NULL DEFAULT false;
UPDATE donations SET special_deduction = true WHERE kind = 'hometown_tax';
ALTER TABLE donations ALTER COLUMN special_deduction DROP DEFAULT;
ALTER TABLE donations ADD CONSTRAINT donations_special_deduction_hometown_tax
    CHECK (NOT special_deduction OR kind = 'hometown_tax');
-- The certified 地域再生計画 (reference data) a corporate donation funds; null for rows recorded before.
ALTER TABLE donations ADD COLUMN revitalisation_plan_id text;
ALTER TABLE donations ADD CONSTRAINT donations_plan_corporate
    CHECK (revitalisation_plan_id IS NULL OR kind = 'corporate');
