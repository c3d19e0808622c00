package pay

import "testing"

// Every seed product sells coins at CentsPerCoin (SPEC §4: 30 元 → 300
// coins): the rate a business pricing its goods in coins charges by.
func TestProductsAtCentsPerCoin(t *testing.T) {
	for _, p := range Products {
		if p.Price != p.Coins*CentsPerCoin {
			t.Fatalf("product %d: %d cents for %d coins, want %d cents a coin", p.ID, p.Price, p.Coins, CentsPerCoin)
		}
	}
}
