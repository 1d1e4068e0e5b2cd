"""NExtLong data synthesis: short documents -> long training sequences with hard negatives."""
