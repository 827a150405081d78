# The berth-trust job: which CA it installs and how its pre-start hands it to the trust store.
require_relative 'spec_helper'

RSpec.describe 'berth-trust job' do
  let(:job) { release_job('berth-trust') }
  let(:ca) { BerthSpec.tls['ca'] }
  let(:link) { { 'berth-registry' => { 'properties' => { 'berth' => { 'registry' => { 'tls' => { 'ca' => ca } } } } } } }

  it 'takes the CA from the berth-registry link unless berth.trust.ca is set' do
    expect(job.render('config/registry-ca.pem', links: link)).to eq(ca)
    expect(job.render('config/registry-ca.pem', properties: { 'berth' => { 'trust' => { 'ca' => 'MINE' } } }, links: link))
      .to eq('MINE')
  end

  it 'refuses to render without a CA' do
    expect { job.render('config/registry-ca.pem') }.to raise_error(/has no CA to trust/)
  end

  describe 'bin/pre-start' do
    let(:root) { tmp }
    let(:store) { "#{root}/ca-certificates" }
    let(:marker) { "#{root}/updated" }
    let(:env) do
      { 'BERTH_JOB_DIR' => "#{root}/jobs/berth-trust", 'BERTH_TRUST_STORE' => store,
        'BERTH_TRUST_UPDATE' => "#{root}/update" }
    end

    before do
      FileUtils.mkdir_p(store)
      File.write("#{root}/update", "#!/bin/sh\ntouch #{marker}\n")
      File.chmod(0o755, "#{root}/update")
    end

    it 'installs one file per certificate, replacing what it installed before, and updates the store' do
      second = BerthSpec.certificate('CN=next-ca', OpenSSL::PKey::EC.generate('prime256v1'),
                                     OpenSSL::PKey::EC.generate('prime256v1'), nil, []).to_pem
      File.write("#{store}/berth-registry-ca-9.crt", 'stale')
      File.write("#{store}/other.crt", 'kept')
      install_job(root, 'berth-trust', properties: { 'berth' => { 'trust' => { 'ca' => ca + second } } })

      run!(env, "#{root}/jobs/berth-trust/bin/pre-start")
      expect(Dir.children(store).sort).to eq(%w[berth-registry-ca-1.crt berth-registry-ca-2.crt other.crt])
      expect(File.read("#{store}/berth-registry-ca-1.crt")).to eq(ca)
      expect(File.read("#{store}/berth-registry-ca-2.crt")).to eq(second)
      expect(File).to exist(marker)
    end

    it 'fails when the CA is not PEM' do
      install_job(root, 'berth-trust', properties: { 'berth' => { 'trust' => { 'ca' => 'not a certificate' } } })
      _, err, status = Open3.capture3(env, "#{root}/jobs/berth-trust/bin/pre-start")
      expect(status).not_to be_success
      expect(err).to include('holds no PEM certificate')
      expect(File).not_to exist(marker)
    end
  end
end
